"""Colossal-AI 0.5.0 1F1B pipeline worker (OneForwardOneBackwardSchedule), fp32, gloo, P processes.

Launch (P processes):
  OMP_NUM_THREADS=1 <venv>/bin/python -m torch.distributed.run --nproc_per_node P \
      --master_addr 127.0.0.1 --master_port PORT colossalai_worker.py --width 64 --samples 16 \
      --microbatches 4 --pipeline 2 --repeats 3 --output out.json

Averaging: the schedule splits the global batch into M micro-batches of B/M samples and divides
each micro-batch's mean MSE by M before backward (one_f_one_b.py forward_step), so the accumulated
gradient is the full-batch mean-loss gradient. No data parallelism / ZeRO here (ZeRO needs CUDA/NPU).
Workarounds for CPU: the process group is initialised directly with gloo (colossalai.launch_from_torch
builds "tcp://[127.0.0.1]:port", which Python >= 3.11.4 rejects, and ignores the backend), and
torch.distributed.is_hccl_available (missing in torch 2.13, called by pipeline/p2p.py) is stubbed.
"""

import common
import model
import torch
import torch.distributed as dist

if not hasattr(dist, "is_hccl_available"):
    dist.is_hccl_available = lambda: False


class Stage(torch.nn.Module):
    """This process's share of the stack; takes x (first stage) or hidden_states (others)."""

    def __init__(self, layers, first: bool, last: bool):
        super().__init__()
        self.net = torch.nn.Sequential(*layers)
        self.first, self.last = first, last

    def forward(self, x=None, y=None, hidden_states=None):
        out = self.net(x if self.first else hidden_states)
        return out if self.last else {"hidden_states": out}


def main():
    args = common.parse_args()
    if args.data != 1:
        raise SystemExit("colossalai worker: only --data 1 (pipeline only) is supported on CPU")
    torch.set_num_threads(1)
    import colossalai
    from colossalai.cluster import ProcessGroupMesh
    from colossalai.interface import OptimizerWrapper
    from colossalai.pipeline.schedule import OneForwardOneBackwardSchedule
    from colossalai.pipeline.stage_manager import PipelineStageManager

    dist.init_process_group(backend="gloo")
    if dist.get_world_size() != args.pipeline:
        raise SystemExit("colossalai worker: world size must equal --pipeline")
    stages = PipelineStageManager(ProcessGroupMesh(args.pipeline), pipeline_axis=0)
    layers = model.stack_layers(args.width, args.blocks)
    keys = model.parameter_keys(layers)
    per_stage = 2 * args.blocks // args.pipeline
    own = layers[stages.stage * per_stage : (stages.stage + 1) * per_stage]
    net = Stage(own, stages.is_first_stage(), stages.is_last_stage())
    optimizer = OptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.0))
    schedule = OneForwardOneBackwardSchedule(stages, num_microbatches=args.microbatches)
    inputs, targets = model.make_batch(args.samples, args.width)
    criterion = lambda output, micro_batch: model.loss_fn(output, micro_batch["y"])  # noqa: E731

    def step():
        optimizer.zero_grad()
        schedule.forward_backward_step(net, iter([{"x": inputs, "y": targets}]), criterion, optimizer)
        optimizer.step()

    optimizer.zero_grad()
    schedule.forward_backward_step(net, iter([{"x": inputs, "y": targets}]), criterion, optimizer)
    stash = common.stash({keys[id(p)]: p.grad for p in net.parameters()})
    optimizer.step()
    times = common.time_steps(step, args.repeats)
    notes = (
        f"colossalai {colossalai.__version__}, gloo, OneForwardOneBackwardSchedule, pp={args.pipeline} "
        f"micro={args.samples // args.microbatches} x {args.microbatches}, fp32; SGD lr=0; loss/M"
    )
    common.finish(args, "colossalai", "1F1B", times, stash, notes)


if __name__ == "__main__":
    main()
