"""Virtual environments for the peer systems and a launcher for their workers.

Each peer gets its own venv under `root/<name>`, made with `python -m venv --system-site-packages`
so it reuses the installed torch; every pip call is constrained to that torch version so torch is
never replaced. Recipes (CPU, gloo):
  deepspeed  : DS_BUILD_OPS=0 pip install deepspeed==0.19.8
  torchgpipe : pip install torchgpipe==0.0.7
  colossalai : pip install its requirements (less torch: it pins torch<=2.5.1), then
               BUILD_EXT=0 pip install --no-deps colossalai==0.5.0
"""

import json
import os
import signal
import socket
import subprocess
import sys
from importlib.metadata import version

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.join(HERE, "envs")
WORKERS = {
    "deepspeed": "deepspeed_worker.py",
    "colossalai": "colossalai_worker.py",
    "torchgpipe": "torchgpipe_worker.py",
}
COLOSSALAI_REQUIREMENTS = [  # colossalai 0.5.0 requirements.txt without torch, pinned as verified
    "numpy",
    "tqdm",
    "psutil",
    "packaging",
    "pre-commit",
    "rich",
    "click",
    "fabric",
    "contexttimer",
    "ninja",
    "safetensors",
    "einops",
    "pydantic",
    "ray==2.60.0",
    "sentencepiece",
    "google==3.0.0",
    "protobuf",
    "transformers==4.51.3",
    "peft==0.13.2",
    "bitsandbytes==0.50.2",
    "rpyc==6.0.0",
    "fastapi",
    "uvicorn==0.29.0",
    "galore_torch==1.0",
    "diffusers==0.29.0",
]
RECIPES = {  # name -> [(extra environment, pip arguments)]
    "deepspeed": [({"DS_BUILD_OPS": "0"}, ["deepspeed==0.19.8"])],
    "torchgpipe": [({}, ["torchgpipe==0.0.7"])],
    "colossalai": [({}, COLOSSALAI_REQUIREMENTS), ({"BUILD_EXT": "0"}, ["--no-deps", "colossalai==0.5.0"])],
}


def ensure(name: str, root: str = DEFAULT_ROOT):
    """Return the python of venv `root/name`, creating it if missing; None (one line printed) on failure."""
    if name not in RECIPES:
        print(f"{name}: unknown peer (expected one of {', '.join(RECIPES)})")
        return None
    venv = os.path.join(os.path.abspath(root), name)
    python, marker, log = (
        os.path.join(venv, "bin", "python"),
        os.path.join(venv, ".installed"),
        os.path.join(os.path.abspath(root), f"{name}-install.log"),
    )
    if os.path.exists(marker) and os.path.exists(python):
        return python
    os.makedirs(root, exist_ok=True)
    constraints = os.path.join(os.path.abspath(root), "constraints.txt")
    with open(constraints, "w") as handle:
        handle.write(f"torch=={version('torch').split('+')[0]}\n")
    steps = [({}, [sys.executable, "-m", "venv", "--system-site-packages", venv])]
    steps += [
        (extra, [python, "-m", "pip", "install", "-q", "-c", constraints] + packages)
        for extra, packages in RECIPES[name]
    ]
    with open(log, "w") as out:
        for extra, command in steps:
            try:
                code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **extra})
            except OSError as error:
                code = error
            if code != 0:
                print(f"{name}: '{' '.join(command[:6])} ...' failed ({code}); see {log}")
                return None
    open(marker, "w").close()
    return python


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_peer(name: str, args: list, processes: int, output: str, timeout: float, root: str = DEFAULT_ROOT):
    """Run peer `name`'s worker with `args` on `processes` processes; return its JSON dict, or None."""
    python = ensure(name, root)
    if python is None:
        return None
    script = os.path.join(HERE, WORKERS[name])
    if name == "torchgpipe":
        command = [python, script]
    else:
        command = [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            script,
        ]
    command += list(args) + ["--output", output]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if os.path.exists(output):
        os.remove(output)
    with open(output + ".log", "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers: one new session
            process.wait()
            print(
                f"{name}: timed out after {timeout:.0f} s; see {output}.log (a DeepSpeed run killed while it "
                f"compiled its shared-memory op leaves ~/.cache/torch_extensions/*/deepspeed_shm_comm/lock behind, "
                f"and the next one waits for it: remove it)"
            )
            return None
    if code != 0 or not os.path.exists(output):
        print(f"{name}: worker failed (exit {code}); see {output}.log")
        return None
    with open(output) as handle:
        return json.load(handle)
