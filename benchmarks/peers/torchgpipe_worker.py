"""torchgpipe 0.0.7 GPipe worker: one process, P partitions on devices ['cpu'] * P.

Launch (single process):
  OMP_NUM_THREADS=1 <venv>/bin/python torchgpipe_worker.py --width 64 --samples 16 \
      --microbatches 4 --pipeline 2 --repeats 3 --output out.json

Averaging: GPipe splits the batch into M chunks, runs them through the partitions and
concatenates the chunk outputs back into one batch; the loss is the mean MSE of that whole
batch, so no per-micro-batch scaling is needed and the gradient is the full-batch one.
Each partition runs on its own worker thread (torchgpipe's per-device threads), all in this process.
"""

import common
import model
import torch


def main():
    args = common.parse_args()
    if args.data != 1:
        raise SystemExit("torchgpipe worker: only --data 1 is supported")
    torch.set_num_threads(1)
    import torchgpipe
    from torchgpipe import GPipe

    layers = model.stack_layers(args.width, args.blocks)
    keys = model.parameter_keys(layers)
    per_stage = 2 * args.blocks // args.pipeline
    net = GPipe(
        torch.nn.Sequential(*layers),
        balance=[per_stage] * args.pipeline,
        devices=["cpu"] * args.pipeline,
        chunks=args.microbatches,
        checkpoint="never",
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    inputs, targets = model.make_batch(args.samples, args.width)

    def step():
        optimizer.zero_grad()
        model.loss_fn(net(inputs), targets).backward()
        optimizer.step()

    optimizer.zero_grad()
    model.loss_fn(net(inputs), targets).backward()
    stash = common.stash({keys[id(p)]: p.grad for p in net.parameters()})
    optimizer.step()
    times = common.time_steps(step, args.repeats)
    notes = (
        f"torchgpipe {torchgpipe.__version__}, single process, balance={net.balance}, "
        f"devices=cpu x {args.pipeline}, chunks={args.microbatches}, checkpoint=never; SGD lr=0; "
        "full-batch mean loss"
    )
    common.finish(args, "torchgpipe", "GPipe", times, stash, notes)


if __name__ == "__main__":
    main()
